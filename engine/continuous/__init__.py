"""The continuous-batching engine: sequences join and leave a running decode at every step.

- `engine.ContinuousEngine`: the engine interface (engine/protocol.py) and its thread's loop,
  schedule -> run -> postprocess;
- `scheduler.Scheduler`: queues, admission into slots, which rows run, finish and free bookkeeping
  (no torch);
- `runner.ModelRunner`: the tensors and model calls: prefill, decode step, slot moves;
- `slots`: the preallocated KV cache and per-slot device state;
- `sampling`: greedy / temperature / top_k / top_p / repetition penalty / seeded sampling of all
  rows at once, on the device;
- `graphs.StepRunner`: eager, torch.compile'd or CUDA-graph replay of the decode step.
The model itself (prefill and decode step on GLM-4V's modules) is engine/models/glm4v/decoder.py.
"""
