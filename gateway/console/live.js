// Keeping a view fresh: poll a loader and redraw only when the answer changed. The browser
// revalidates with If-None-Match, so an unchanged resource costs a 304.

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// Calls `load()` every `ms` until `signal` aborts or `more(data)` is false; `draw(data)` when the
// answer differs from the previous one (the first previous one being `initial`, already on screen).
export async function poll(signal, ms, load, draw, { initial, more = () => true } = {}) {
  if (initial !== undefined && !more(initial)) return;
  let last = JSON.stringify(initial);
  for (;;) {
    await sleep(ms, signal);
    if (signal.aborted) return;
    try {
      const data = await load();
      const text = JSON.stringify(data);
      if (signal.aborted) return;
      if (text !== last) {
        last = text;
        draw(data);
      }
      if (!more(data)) return;
    } catch (error) {
      if (signal.aborted || error.status === 401) return;
    }
  }
}
