"""Engines run methods: `local` is the in-process runner (the default); `flower-sim` and
`flower-deploy` run the same method code on Flower (optional extra `pf2lora[flower]`)."""

ENGINES = ("local", "flower-sim", "flower-deploy")
