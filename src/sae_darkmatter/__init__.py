"""sae-darkmatter."""
