"""Short, varied chat prompts for throughput benchmarks (not an evaluation set)."""

PROMPTS = [
    "Write a short story about a fox who learns to sail.",
    "Explain how a refrigerator keeps food cold.",
    "List some ideas for a rainy afternoon.",
    "Describe the city of Lisbon to a visitor.",
    "Give advice to someone starting to run.",
    "Write a poem about autumn leaves.",
    "What makes a good cup of tea?",
    "Summarize the plot of a heist film you invent.",
]
