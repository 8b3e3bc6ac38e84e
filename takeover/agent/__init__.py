"""Everything that reads or runs what the agent controls: the one place to audit.

Its command line and files, its QEMU's answers, its disk's headers (read as the agent, in
the sandbox) and the replay of its QEMU for a rollback. Nothing here trusts what it reads;
each module's docstring names the attack it answers.
"""
