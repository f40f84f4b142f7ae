"""The continuous-batching engine: sequences join and leave a running decode at every step.

- `engine.ContinuousEngine`: the engine interface (engine/protocol.py) and its thread's loop,
  schedule -> run -> postprocess;
- `scheduler.Scheduler`: queues, chunked prefill, admission into slots and KV blocks, preemption,
  which rows run, finish and free bookkeeping (no torch);
- `blocks.BlockPool`: which blocks of the paged KV cache are held, free or cached, by reference
  count, with the prefix cache's index and LRU eviction (no torch);
- `prefix_cache`: the blocks' keys, a hash chain over tokens, image content and cache_salt (no torch);
- `encoder_cache.EncoderCache`: vision features by image content, within a byte budget (no torch);
- `runner.ModelRunner`: the tensors and model calls: prefill chunks, decode step (whole, or in two
  halves while grammar rows decode), slot moves, grammar masks, logprobs;
- `slots`: the paged KV cache and per-slot device state (block tables, sampling parameters);
- `sampling`: penalty / end-of-sequence suppression / grammar mask, then greedy / temperature /
  top_k / top_p / seeded sampling of all rows at once, on the device;
- `graphs.StepRunner`: eager, torch.compile'd or CUDA-graph replay of the decode step.
The model itself (prefill and decode step on GLM-4V's modules) is engine/models/glm4v/decoder.py;
decode attention over the paged cache is engine/attention/.
"""
