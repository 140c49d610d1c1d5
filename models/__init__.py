"""Example models. Add yours here and point `conf/model/<name>.yaml` at it with `_target_`."""
