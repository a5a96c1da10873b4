"""Jobs: resource control and accounting modelled on Windows Job objects (cgroup v1 and v2).

See :mod:`isobox.jobs.job` for the behaviour and :mod:`isobox.jobs.limits` for the units.
"""

from isobox.jobs.job import Job
from isobox.jobs.limits import Accounting, IoLimit, JobEvent, Limits

__all__ = ["Accounting", "IoLimit", "Job", "JobEvent", "Limits"]
