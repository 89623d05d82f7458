"""Training: IPL's two stages and the NADA baseline, in the order of the method.

Read the modules in this order:

- `setup`: the models of a run (source generator, CLIP models, prompt encoder) and a fresh mapper.
- `text`: fixed CLIP text features, encoded once per run.
- `losses`: every loss term as a pure function of features.
- `stage1`: stage 1, the mapper that writes image-specific prompts (`Stage1State`, `stage1_step`).
- `stage2`: stage 2, the adaptive layer choice and the adaptation step (`Stage2State`, `stage2_step`).
- `stage1_run`, `stage2_run`: each stage as a resumable run (log, state.pt, checkpoints).
- `samples`: the sample grids written during stage 2.
- `guard`: NaN/inf and memory checks around every step.
- `run`: the run directory (`RunDir`, `RunInfo`, `finished_runs`).
- `adapt`: the whole `ipl adapt` pipeline (`adapt(domain, ...) -> AdaptResult`).

docs/method.md states the method these modules implement.
"""
