from scenarios.cli import main

raise SystemExit(main())
