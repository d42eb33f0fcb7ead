"""Training: the command (`cli`), one run from config to exit code (`run`), a new
run from another model's weights (`init_from`), what it trains (`assembly`:
model, `optim`imizer and `schedule`, compiled `step`), the loop (`trainer`) and
its bookkeeping (`logbook`, the experiment trackers `reporters`, `signals`,
`resume`, `lock`, `memory`, the time `budget`), and data-parallel ranks
(`distributed`, `launch`, `watchdog`)."""
