from zhtune.cli import main

raise SystemExit(main())
