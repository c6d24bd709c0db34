from sftlens.cli import main

raise SystemExit(main())
