"""Measure where a backbone's features stop serving a new task, and choose the fine-tuning strategy from it.

extract's one forward pass of the train and val images keeps the globally
average-pooled output of every named block in the feature store
(``models/features.py``); a linear probe per block --
logistic regression on standardized vectors, C chosen by cross-validation on
train, scored on val with a bootstrap interval -- gives the accuracy curve
from input to output (``linear``). Two dataset measures place the data in the
classic 2 x 2 table, small or large and like ImageNet or not, and a pure
function of (curve, measures, params) recommends ``head_only``,
``last_blocks: N`` or ``full`` with a reason in words (``recommend``).
``report`` writes the JSON, CSV and PNG; ``job`` runs it all for the stage;
``choice`` turns ``finetune.strategy: auto`` into the recommended strategy.

Only ``job`` (through the feature store's loader) imports torch: ``recommend`` and
``choice`` are plain Python, so finetune's resolution and the rule's tests stay light.
"""
