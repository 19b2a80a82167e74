"""`mimajax evaluate`: the papers' face-animation metrics on same- and cross-identity pairs of a prepared dataset.

  dataset      the videos of a `mimajax prepare` folder, indexed without decoding a frame (frames read per pair)
  protocols    the pair lists: same-identity reconstruction and cross-identity reenactment, deterministic per seed
  scoring      one pair of one system -> per-frame metrics; FID features collected per protocol and system
  report       summary.json, per-pair JSON, the paper-style markdown table, the PNG grid and per-frame plots
  command      the command line (`mimajax evaluate`) and the loop over pairs and systems

Systems: the model (any family's checkpoint, through `Family.load_animator`), folders of generated videos (`--videos
NAME=DIR`, one `<pair id>.mp4` per pair: other systems' outputs, scored on the same pairs), and the two baselines
every report carries: copy the source (a still frame) and copy the driver (the driving frames themselves).
"""
