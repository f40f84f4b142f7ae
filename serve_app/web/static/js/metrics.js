// The figures shown under an answer: time to the first token, decode speed, and token counts
// (the server's usage when it sent one, else the number of pieces received).

/** Times one streamed answer: make it when the request goes out, call piece() per content piece. */
export class AnswerMetrics {
  constructor() {
    this.started = performance.now();
    this.firstAt = null;
    this.lastAt = null;
    this.pieces = 0;
  }

  piece() {
    const now = performance.now();
    if (this.firstAt === null) this.firstAt = now;
    this.lastAt = now;
    this.pieces += 1;
  }

  /** One line, such as "first token 80 ms · 41.2 tokens/s · 20 prompt + 16 completion = 36 tokens". */
  summary({ usage = null, finish = null, stopped = false } = {}) {
    const tokens = usage ? usage.completion_tokens : this.pieces;
    const parts = [];
    if (this.firstAt !== null) parts.push(`first token ${Math.round(this.firstAt - this.started)} ms`);
    const rate = this.tokensPerSecond(tokens);
    if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
    if (usage) {
      parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
    } else if (tokens) {
      parts.push(`~${tokens} tokens received`);
    }
    if (stopped) parts.push("stopped");
    else if (finish === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }

  // Decode speed: the tokens after the first over the time from the first to the last. When they
  // arrived in one burst (too short to time), the rate over the whole request instead.
  tokensPerSecond(tokens) {
    const span = this.firstAt !== null && this.lastAt !== null ? (this.lastAt - this.firstAt) / 1000 : 0;
    if (tokens > 2 && span >= 0.05) return (tokens - 1) / span;
    if (tokens > 0 && this.lastAt !== null && this.lastAt > this.started) {
      return tokens / ((this.lastAt - this.started) / 1000);
    }
    return null;
  }
}
