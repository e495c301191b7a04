"""The site's own tests, in the TestCase style of a 0.8 site (``manage.py test``).

A TestCase runs each test in a transaction that is rolled back, so nothing
commits: the ledger's wake-ups, signals and cleanups wait for a commit, and run
here only inside ``captureOnCommitCallbacks(execute=True)``.
"""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.management import call_command
from django.test import TestCase

from mysite.gallery.models import MyModel, queued_s3storage
from mysite.transferlog.models import TransferLogEntry


class MyModelTests(TestCase):
    def test_delete_cleans_up_after_commit(self) -> None:
        obj = MyModel.objects.create(image=ContentFile(b"gif", name="x.gif"))
        name = obj.image.name
        with self.captureOnCommitCallbacks(execute=True):
            queued_s3storage.delete(name)
        self.assertFalse(queued_s3storage.local.exists(name))

    def test_transfer_signal_in_a_test_case(self) -> None:
        obj = MyModel.objects.create(image=ContentFile(b"gif", name="y.gif"))
        with self.captureOnCommitCallbacks(execute=True):
            call_command("process_transfers", verbosity=0)
        self.assertTrue(queued_s3storage.using_remote(obj.image.name))
        self.assertEqual(TransferLogEntry.objects.get().name, obj.image.name)
