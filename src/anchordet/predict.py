"""`python -m anchordet.predict ckpt_path=<run>/checkpoints/last.ckpt source=<image | folder | glob | list>`.

The module form of the checkout's `predict.py` (same config, `conf/predict.yaml`): run a trained
checkpoint on images without annotations; see `anchordet.trained.predict`.
"""

if __name__ == "__main__":
    from anchordet.trained import run_command

    run_command("predict")
