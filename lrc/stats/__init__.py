"""Statistics: what calibration measures of every targeted linear, how it is collected, and where it is kept."""
