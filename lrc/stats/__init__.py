"""Statistics: what calibration measures of every targeted linear, how it is collected (one layer walker, the
input and output-gradient passes), and where it is kept (the store)."""
