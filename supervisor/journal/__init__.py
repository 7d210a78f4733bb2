"""The supervisor's on-disk journal: every observation, numbered, kept until the gateway has it.

Public surface: :class:`Journal` and its options, stats and error. The modules underneath each do
one job: ``frames`` (binary framing and CRC), ``codec`` (payload bytes), ``segments`` (segment
files: scan, repair, eviction rewrite), ``state`` (the persisted epoch and sequence marks),
``fsio`` (atomic, durable file replacement) and ``journal`` (the class that ties them together).
"""

from supervisor.journal.errors import JournalError
from supervisor.journal.journal import Journal
from supervisor.journal.options import FsyncPolicy, JournalOptions, JournalStats

__all__ = ["FsyncPolicy", "Journal", "JournalError", "JournalOptions", "JournalStats"]
