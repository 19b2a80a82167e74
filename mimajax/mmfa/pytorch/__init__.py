"""PyTorch references for MMFA's face-vid2vid modules (imported by the parity check and tests only: torch is no
runtime dependency of mimajax). `face_vid2vid` transcribes the public reimplementation whose released checkpoint
initialises MMFA (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis)."""
