// auction.cpp's AVX2 build: each vector width compiles from its own file so that setup.py can
// build them side by side (their objects would otherwise share one path).
#include "auction.cpp"
