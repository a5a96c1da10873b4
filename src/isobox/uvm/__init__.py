"""Utility VMs: the small QEMU microvm each ``--isolation=vm`` container runs in.

``assets`` builds the guest kernel, initramfs and read-only image; ``accel`` picks KVM or
TCG by booting a probe VM; ``vm`` launches and controls one VM (QMP, the agent channel);
``scratch`` makes the ext4 file a container's writable layer lives in.
"""
