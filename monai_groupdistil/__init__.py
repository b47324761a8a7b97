"""monai-groupdistil: group distributionally robust knowledge distillation (GroupDistil) for MONAI.

The losses (:mod:`monai_groupdistil.losses`) need only torch and MONAI; engines and handlers
additionally need pytorch-ignite.
"""

__version__ = "0.1.0"
