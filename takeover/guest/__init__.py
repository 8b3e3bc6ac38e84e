"""The host's copy of the guest, offline: the libguestfs editor, the scrub, and what the host writes into it."""
