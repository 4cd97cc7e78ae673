from resnet_serve.cli import main

raise SystemExit(main())
