"""Statistics over served traffic: prompt drift tests."""
