"""Front ends: what a notebook user touches. ``%%dbllm`` (`magic`, its subcommands in `commands`),
the widget panel (`panel`), side-by-side comparisons (`compare`), and what they share: one prompt
from its settings to the rendered answer (`cell`), how an answer looks (`render`) and the kept
conversations (`history`). They call the layers below; nothing below imports them."""
