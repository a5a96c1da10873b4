"""The guest agent: the utility VM's Guest Compute Service.

``protocol`` is the host<->guest wire format (row 1), ``client`` the host's end (row 2),
``guest`` the agent that runs inside the VM (row 3). Nothing is imported here: the guest
must stay light (every import is paid when a utility VM boots), and the host's client must
not pull the guest's code.
"""
