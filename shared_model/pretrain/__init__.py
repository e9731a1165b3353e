"""Pretraining of the foundation that federated runs adapt: public task folders and synthetic scenes
(never the federation's data), every weight of SAM and CLIP trained, exported in the real weights'
formats (see :mod:`shared_model.pretrain.run`)."""
