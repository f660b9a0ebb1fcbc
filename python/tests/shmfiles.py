"""Segment files in /dev/shm for the tests, all removed afterwards."""

import glob
import mmap
import os

SHM_DIR = "/dev/shm"
PREFIX = f"picloud-test-{os.getpid()}-"


class Shm:
    """Creates segment files named ``picloud-test-<pid>-<n>``."""

    _counter = 0

    def __init__(self):
        self.paths = []
        self.maps = []

    def create(self, size, data=b""):
        """A new segment file of ``size`` bytes starting with ``data``."""
        Shm._counter += 1
        name = f"{PREFIX}{Shm._counter}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            if data:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        self.paths.append(path)
        return name, path

    def allocate(self, size):
        """An ``allocate_segment`` callback for _payload.encode."""
        name, path = self.create(size)
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.maps.append(mm)
        return name, mm

    def cleanup(self):
        for mm in self.maps:
            try:
                mm.close()
            except BufferError:
                pass
        self.maps.clear()
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()


def leftovers():
    return glob.glob(os.path.join(SHM_DIR, PREFIX + "*"))


def remove_leftovers():
    for path in leftovers():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
