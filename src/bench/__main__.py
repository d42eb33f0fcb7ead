from .training import main

raise SystemExit(main())
