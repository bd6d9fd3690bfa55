"""bonecluster: unsupervised sorting of bone radiographs with deep clustering.

Stage 1 groups upper-limb X-rays into the seven MURA body parts; stage 2 separates
normal from abnormal studies within each part (DeepCluster, Caron et al. 2018).
"""

__version__ = "0.1.0"

BODY_PARTS: tuple[str, ...] = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
