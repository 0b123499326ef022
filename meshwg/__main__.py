from meshwg.cli import main

raise SystemExit(main())
