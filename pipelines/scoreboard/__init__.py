"""The scoreboard modules of pipelines/."""
