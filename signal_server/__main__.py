from signal_server.cli import main

raise SystemExit(main())
