/* librelmarker.so: the preload of tests/release; rel_probe looks for this symbol. */
int rel_marker = 1;
