"""`python -m proxy.agent`, or by path with nothing installed: `python3 -I CHECKOUT/proxy/agent ...`."""

import sys

if not __package__:
    # Run by path: Python put this directory first on sys.path; import the package from the checkout instead.
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent.parent))

from proxy.agent.commands import main  # noqa: E402

sys.exit(main())
