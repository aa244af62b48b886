from lightning_gradflow.demo import main

raise SystemExit(main())
