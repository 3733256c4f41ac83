"""The main job: a synthetic clickstream through the whole platform, end to end."""
