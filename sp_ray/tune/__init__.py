"""Ray Tune sweeps of SP pre-training and fine-tuning settings across labeled fractions (``sp-ray tune``).

``spec`` reads the sweep file, ``space`` turns its search space into Tune's, ``trial`` is one trial
(cached proposals and pre-training, then fine-tuning in Ray Train), ``scheduler`` is ASHA per fraction,
``sweep`` builds or restores the Tuner, ``results`` writes the tables, best configs and plot.
"""
