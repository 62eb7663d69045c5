"""Where a stack's loss comes from: a weight quantizer's loss split over the matrices (or decoder
layers) it quantizes, and the fewest of them to keep at higher precision to pass (`qualgate attribute`)."""
