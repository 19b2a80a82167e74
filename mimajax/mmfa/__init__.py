"""MMFA (Motion Manipulation via Unsupervised Keypoint Positioning in Face Animation) as a model family.

A face-vid2vid-lineage GAN animator: canonical 3-D keypoints of the source, moved by the driver's head pose
(R, from a pretrained pose estimator or the pose stored per frame by motion extraction), scale, translation and
a decoupled expression deformation (eq. 5), drive a dense 3-D motion field that warps the source's appearance
feature volume; a multi-scale generator decodes it. An expression VAE (sec. 3.3) maps the expression codes to a
Gaussian latent space for interpolation. See `../shared/papers/mmfa.txt`.
"""
