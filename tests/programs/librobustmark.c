/* librobustmark.so: the preload library of the robustness tests. Loading it is all it does; a
 * program sees it in /proc/self/maps. */
int vgpu_robust_mark = 1;
