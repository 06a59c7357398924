from densenet.cli import main

raise SystemExit(main())
