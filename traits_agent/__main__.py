"""`python -m traits_agent` is the same as the `traits-agent` command."""

from traits_agent.cli import main

raise SystemExit(main())
