"""The application: the Hydra entry point ``flatq-train``, its LightningModule, data modules and models.

Library users need none of this: the callbacks (:mod:`flatq_lightning.callbacks`) and PTQ
(:mod:`flatq_lightning.ptq`) work with any LightningModule and data. The configs are ``conf/`` at the top of
the repository (shipped in the wheel as ``flatq_lightning/conf``).
"""
