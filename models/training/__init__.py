"""Training and evaluation of the detector on simulated studies (seed 002 with seed 000's harmonization).

1. Rules (``data``): per study kind, one seed-000 rule per scanner condition, fitted from *unlabeled* studies of
   every condition against the reference condition (the one with the most images); training volumes and held-out
   volumes are harmonized with them, exactly as the node does at inference.
2. Landmarks (``train``): 2.5D patches at every simulated anatomical landmark (head and chest: 58 classes) plus
   background, mini-VGG trained to classify them (pretraining).
3. Lesions (``train``): patches at every candidate of harmonized training studies (positive near a lesion, plus
   jittered copies of the truth), mostly at the "eval" size where a 2–3 mm aneurysm spans several voxels and some
   at the coarse "test" size; mini-VGG fine-tuned from the landmark trunk (or from scratch, for the comparison),
   each epoch on all positives and hard negatives mined by the model itself.
4. Evaluation (``evaluate``, the one hit rule): FROC, candidate recall and patch AUC on held-out studies under
   conditions never used for training; thresholds from validation studies of the training conditions.
5. Model cards (``card``) and recipe sweeps on a GPU (``sweep``).

Everything is deterministic in ``seed`` (simulation, sampling, initialisation, batch order).
"""
