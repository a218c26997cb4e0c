"""Entry points: `python -m detector <name>` runs the module's `main()`, or the function
named after a colon."""

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("detector.commands.demo", "synthetic data, fit, evaluate: the whole loop"),
    "fit": ("detector.commands.fit", "fit a memory bank and calibrate its threshold (Hydra)"),
    "evaluate": ("detector.commands.evaluate", "metrics and plots on the test split (Hydra)"),
    "export": ("detector.commands.export", "save backbone and bank to the BentoML model store"),
    "pipeline": (
        "detector.commands.pipeline",
        "fit, evaluate and export (and ship with bentoml models export): the training job",
    ),
    "simulate-drift": (
        "detector.commands.simulate_drift",
        "score shifted test images: how the detector behaves when the line changes (Hydra)",
    ),
    "products": (
        "detector.commands.banks:products_main",
        "list products and their live bank versions, or one product's history",
    ),
    "add-images": (
        "detector.commands.banks:add_images_main",
        "add defect-free images to a product's bank: a new version, live without a restart",
    ),
    "rollback": (
        "detector.commands.banks:rollback_main",
        "serve an earlier version of a product's bank again (as a new version)",
    ),
    "set-threshold": (
        "detector.commands.banks:set_threshold_main",
        "move a product's operating point (false-alarm target or threshold): a new version",
    ),
    "set-mask": (
        "detector.commands.banks:set_mask_main",
        "ignore regions of a product's frames (a mask image; --clear): a new version",
    ),
    "check-int8": (
        "detector.commands.banks:check_int8_main",
        "run a product's int8 check again (after a mask change): a new version",
    ),
    "suggest-threshold": (
        "detector.commands.records:suggest_threshold_main",
        "rates of reviewed records at the live and a suggested threshold; --apply sets it",
    ),
    "replay": (
        "detector.commands.records:replay_main",
        "rescore recorded images with the recorded model versions; report changed decisions",
    ),
    "export-reviews": (
        "detector.commands.records:export_reviews_main",
        "reviewed images in the MVTec AD layout (train/good, test/confirmed_defect)",
    ),
    "migrate-records": (
        "detector.commands.records:migrate_main",
        "bring the records database's schema up to date (Alembic)",
    ),
    "set-drift-reference": (
        "detector.commands.set_drift_reference",
        "replace a bank's drift reference with chosen defect-free images",
    ),
    "synthetic-data": (
        "detector.commands.synthetic_data",
        "write the synthetic carpet set in the MVTec AD layout",
    ),
    "random-backbone": (
        "detector.commands.random_backbone",
        "write a random-weight DINOv3 checkpoint (tests, timing)",
    ),
}
