"""Every raw kernel interface isobox uses (ctypes, netlink), in one place.

Each failure is raised as :class:`isobox.errors.SystemError_` naming the operation, the path
or id, and the errno.
"""
