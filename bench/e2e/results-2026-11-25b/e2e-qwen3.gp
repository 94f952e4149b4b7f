# gnuplot e2e-qwen3.gp (from the folder holding e2e-qwen3.dat) writes e2e-qwen3.png
set terminal pngcairo size 1600,3420 font ',9' noenhanced
set output 'e2e-qwen3.png'
set multiplot layout 9,1
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel 'ms/token'
set grid ytics
set xtics rotate by -40 font ',8'
set key top right
set title '.devdata/flame_moe_290m_seq0-1_x_512tok_top6.csv, batch 1: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 0 using 2:xtic(1) title 'measured', '' index 0 using 3 title 'simulator'
set title 'tiny-mixtral-32e/router_logits_code.npy, batch 1: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 1 using 2:xtic(1) title 'measured', '' index 1 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 1: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 2 using 2:xtic(1) title 'measured', '' index 2 using 3 title 'simulator'
set title '.devdata/flame_moe_290m_seq0-1_x_512tok_top6.csv, batch 4: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 3 using 2:xtic(1) title 'measured', '' index 3 using 3 title 'simulator'
set title 'tiny-mixtral-32e/router_logits_code.npy, batch 4: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 4 using 2:xtic(1) title 'measured', '' index 4 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 4: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 5 using 2:xtic(1) title 'measured', '' index 5 using 3 title 'simulator'
set title '.devdata/flame_moe_290m_seq0-1_x_512tok_top6.csv, batch 16: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 6 using 2:xtic(1) title 'measured', '' index 6 using 3 title 'simulator'
set title 'tiny-mixtral-32e/router_logits_code.npy, batch 16: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 7 using 2:xtic(1) title 'measured', '' index 7 using 3 title 'simulator'
set title 'live (random routers, speculative prefetch), batch 16: measured vs simulator (qwen3 shapes, per token over 48 layers)'
plot 'e2e-qwen3.dat' index 8 using 2:xtic(1) title 'measured', '' index 8 using 3 title 'simulator'
unset multiplot
