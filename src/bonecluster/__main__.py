from bonecluster.cli import main

raise SystemExit(main())
