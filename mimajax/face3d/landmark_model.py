"""A landmark morphable model: MediaPipe FaceMesh's 478 points as the 3DMM behind extracted motion coefficients.

For videos without Deep3DFaceRecon coefficients, `mimajax.faces.motion_fit` fits pose, gaze and expression to
MediaPipe FaceMesh landmarks (MIMAFace's motion representation, with landmarks in place of the BFM). The model it
stores beside the dataset (`face_model.npz`) is a `MorphableModel` like the BFM, so `render_coefficients` draws the
face its coefficients describe:

  mean_shape        (478, 3) the dataset's mean landmark shape in the canonical frame, decimetres (x right,
                    y up, z towards the camera: the BFM's frame and units, so the Deep3DFaceRecon camera fits)
  expression_basis  (1434, 64) the PCA basis of the non-rigid residual, rows interleaved x0, y0, z0, x1, ...
  identity_basis, texture_basis  zeros (80 columns each)
  mean_texture      a flat grey albedo
  triangles         MediaPipe's face mesh with irises (906 triangles), counter-clockwise seen from +z
  keypoints         LANDMARK_KEYPOINTS: iris centres, nose tip, mouth corners (image left to right)

The canonical mesh is MediaPipe's `face_model_with_iris.obj` (google-ai-edge/mediapipe,
`mediapipe/modules/face_geometry/data`, Apache-2.0), stored below in centimetres as zlib-compressed base85
(float32 vertices (478, 3), then uint16 triangles (906, 3)); `canonical_face_mesh` converts it to decimetres.
"""

from __future__ import annotations

import base64
import functools
import os
import zlib

import jax.numpy as jnp
import numpy as np

from mimajax.errors import CheckpointReadError
from mimajax.face3d.morphable_model import EXPRESSION_DIM, MorphableModel, from_mesh, load_bfm

NUM_LANDMARKS = 478  # FaceMesh with refined irises: 468 mesh points, then 468-472 and 473-477 (centre first)
NUM_TRIANGLES = 906
CM_PER_UNIT = 10.0  # model units are decimetres, as the BFM's (a face about 1.5 wide at the camera's 10 away)
GREY_ALBEDO = 180.0  # flat mean texture, 0..255
# Iris centre at -x, iris centre at +x, nose tip, mouth corner at -x, mouth corner at +x (image left to right),
# the same roles as Deep3DFaceRecon's five keypoints.
LANDMARK_KEYPOINTS = (468, 473, 1, 61, 291)
FORMAT = "mimajax-face-model"

_CANONICAL_MESH_B85 = (
  "c-l>uby!u|_lMWQX25R5ZtPa%o@L>vV4-67*n(hS2cf96fdUGOh=r}7B4;Bgc6W@9?bor#7<Kgb;r<?<Xa93}*J0laXP>>+dKVGVVw-`gQh!r`<meJ"
  "%)@=30%29jsDUW-Z^6!#Y8J(l189iOETJNu~{wkxx@%L8#(&~sM`uH;|U+7X%yxSfUmvX_X)|cv%__UYx{*Ty&a;m~sE592MCx!a#u(G95-gfEZ!mT"
  "{I?PN7Q<%pGikIz=eTkW;-jZF*G&wR;N_8b(c%n$$n+3Y*fs^`1iR_>ONpo$v%tXz86cGb7)9xJDv%2qpn-)QBB)s$Hw`jOoH?OI06{v&2{kMk0F@u"
  "7PBB1NL|opp(KuB~dh*~q%iGvwPIH`S=&52FK5l@f72Dk8{6EQ7|&f6v0yx?&FE`nro846s!vYubqf&X5ETcXhr`ce%JfK%y%-DNA*C>GQ!~EPK3_-"
  "O8@=!Fj$EsTHJ7<#dpG_FnSOw++fB_Os!?y|KJ2T1-8Tf2BNUg~;rVVe0Dqx-y_#H}SgnR8_xLRJLDO<?<~0koq*Vw73_smpLU`sPoHOnN9D8N?Mf`"
  "X04Kam02`hzEyWH^VgfBF0|b#b&OPVU6JAH<bz#u+~K2{F=ndz`FDckJrQAk?=xSmEw))atDZD}Ci$z&A7aEiwvKw@n4k(5Tr5tTZ)dEs3o)lHeJSf"
  "}{m59k^h3skGOwkK!xnX8;!OGJ;wf%F?wDT}%rZ*;87b=7IrGTxKIWhHhb3+B74znZ3TEAyz4Cqj8ui=SrsnvTBW3a9e=;_CMOzj+Ka$Obyw#)*5z>"
  "2Iq+GuirMhfeDh)yx$?tDZs+D`LNIU<7#+lA>=K7F8*)%#)Dvz{NYbLtN!MqD)cciOI>b6`Z7YmTY0yoskwriF9`1@v?3v0|Gos!Lj*i?Ccsg0TW<B"
  "Yj!>tUJG#8IhF%hbwJOXaeIy$a4)sv0*965o(`m6ftqMpvF9T`!(7<Gv@Ded2eDtJG1SPesW1dFv!$OCwd=IZ^)ePmqM*5o&f>Y8SiBOWHTyr>Z<TD"
  "D4L}kQrq<s@sm2CH7;4I2BJ-p*4bKXT9c9;M*A$R&A{Wr=KyNwXA1OD>zA&iA$Bp*bQdzcwgl^G)3I9@0nG<&Q%$C6J*h<AhT`Y5%XG;15z%$q)K11"
  "OkHdrEJG6Ws8U_RRf+8pQsrzRwc$pvD$;6^^c&-A+6DxgA)_x!pk2Coy3QgsZqN!@;TT}14OpONCa;tJVFk?(5ernUNt<MtT_<y<eU=&&5-%glH8rp"
  "I+p7Hg@08dnPG;cf^(v$LZpjF$Vs^BwR>p{(a>Bio*<(e7YW`rG{Fj++K3f*59^a0ZZ)eV%FWZDG*FrH8*Xy3y=IjcU<ryml`@b|x2gRtugJWb|WEr"
  "*ktgG_LiIt)Q->LiE7n@lz4k|YXtL(UIuC`o}dFNl4A5Vs;li4A1?As?Zt$wJw{VZHQzAI}wKOkju_=v22xz9W?;g0$JV6wDdUB?W#|J?jv;t_fJyp"
  "*awuekAg!cuwgzK@!4?7B<FrT}sOaMv8ueWK}MZjt64HYxjMZ)8`;x)RbhQtfPeT3Q{QDA%ejP%jrIiv8bVQuwZ|Do}Q(3R)c|)i&)lX=H-Dsjy9Qx"
  "?M0&)w?45X04MU<=&f3Pv&Wtb2eDobzH30+82>{?k~&yQq{G6`;9Rh93-dcYx7WcX-WAsT@G%HS5<R5%IhJWr1z!GX5a1y47W8gVplEMG@R?1OM9G?"
  "9S_f|g3r8-W9~PNH?CXM_R79Sl|dFsy%wsv+-YSj_8lREEgovo%E88-JAP6q*g+k+8eyC;7D=l83-jfZBS!vuOGFwLH7$EeNVRHvrPSrqs2c^${-@s"
  ">lg{r|g?hP5SiX8P*>`5fQ_B%ExywVD<#OJvmY!ninj9zIIiFRH!DVDiA5!m%?lr5w`P*nZG)$hZd~9BxGTXFo87m8Bu2M@D*Oj>=I>{1qn^~z#WQL"
  "7Hmekw+T%F3>TD7iSR7J$UGLxs(kcEq;NbOOR%==qbxkN6!CRg$%s4u;<RTIm5W7Xk}$|m)Ra{t`Icv1F=^1jl;JimO!QP;1B)%iEcs!il1<7kCDs^"
  "#PfvM#8#v1xL7)uDRc%rzGSq*$9)8Gi0J%{l!qOP7uL)r`MtWo&kglFPQ|)R*!_WdErg!~fv~W!jaIxa4t?*Rz{)xmH}NCi#dFYNw{vSfR!Z43|2AI"
  "jYp7FXsE#SB<6flgu*dB{L&z0;KyKchw`fVCHv^rn0G-zY5LysoW=gGIG!A^{JQS$o&Ls?`S)%bY|L&U|H6$fhymkq})vRkt#EaE3YNxWJ%H_*>duy"
  "IXS12ki#VDS|?l04;>(Oem2%MbJAN$g%}^}XWhbFq~IAp>;E}+zl(TOo+-Ki|Mp?d;yK7ml2$KNZ~tr|O<oL@W~bh%pA!PmYv!4`_wW8wQFgQ(Z2f;"
  "i##T{|*N#fbL66Mi$DP!zOPi&GZ=C5dFxp%*J3}gWa5nP}sH(b_Ic#0;-@li5hbBwSK7nfb<NGR%o#fy@9_o)8AC;efe;HJ3i#gH7HZy4UYB^ChLw%"
  "{0qaGz!F>{~mx7dc#XuY>MA0K08_FZq>tD0v0PH&4{=B~wY()mOQ)nj#$O#U`Tyn_E!qiR-AYkK6*D8D(x9KAD4{k)qf#T!POeZr&Ei=vw)DI>w0+h"
  "VQydsVWGirZ=~8keYi!Z*urZ;zWZS{+tfWsSs@{A&6<3{q<@hDxzz1yr$7foecjr2K4OT#ZRwr1~aCNxtzdRPERas(4VioO-cEUFljxb*tD?f(H4Tw"
  "d?<5<Z;_9ms@Nx|2pU@TgNUD+Z&He7u%LH20bjY-rr{ax&dnSizQ<Dn4%8+yHH&!P(V_ecQgxa=_dIjV<oEk7t`2!MIGJ|VSV14F-weyQ#YlGC9gSe"
  "?`dPSnQgt_#QC0asp@Ij7#(kZy*$xkcjkcg{<NAul+)QHD-S+=Uv+!2Nuqrgm=34!sonkK<>H*)D$Hevih1QLS?@}yX|qq7U;m1dmP?(~$H**|QX)Y"
  "1bf2!u<z$=P#s!LFxQjX(QcN|g5GM0Sgs6{)os?Je@#1kY)_l9~s~Vj*UIHc^H=`=sWo+@<EPYzeR8{(As<h`Ga&LGi)#iV<)NzMt;&9bl**c=O&-W"
  "6CJXz{v19w#<Hr=qh6{QaKidJP`S>)>0%SyS-RokD3yLc@grg{atsa16YW#fSav(*@PWBQG)l3hK*Tt?pJVV6sCHZ{$h=o)37`;;yrZj($m?*is;6&"
  "}dE-4D#d_eRLvxy!_JZf!Mq*JQEXzFcgs_g8nCc}e)ArIIqqUwv*pQ7U-*%U`cosD2}cipP-gl6OIp%IQ*7=Dw*b=>ad4%didxAM1Ry-}=?+i^mmXg"
  "-vJi>*lX!7CdUm;-RSZy;PVb-Dq^vOO9q$QFeJR7~Z4&q@C+`bN-`O#`Vy7;@9A`xvgV<>6+#*-{hkj(Yu~uJaJGim-m_}OShYa>+P3}z>#Ld#M(yU"
  "j2xLcyrWtDlAk$o{zI|d@G|3j);2S{$u03pGRy+|gUx-*Z^`=h>&?d>PMh_I?~;GrPGp46-fspa{V6TZC1&ipc+M=*`Jybif5{vbQ%$CJ_LHw^3Fhu"
  "6juITSSa#$IG(+c=l|lzrSe@Bza%1^ezmH^nj8Hx<ZDh>RzPavg`Q_eNBfq>F9&6D&Ry2<l&0|ILSkXLIG>;X{V@2~=(L7c(j}^^hMe|tEJXSQ170q"
  "Ks^H|Y5*3dlG&^*@AJl4=W*3dlG&^%T&kF{tXYtcMbG><hjk2N%pH8hVE&0{T^$BO2$qIs-n9&2bGE1JiO=CPuAtf6_Vp?R!m9xIy1isrF~=CPuAtY"
  "{u9n#YRfv7&jbXdWw?#~PZ)8k)x%n#UTN$BO2$qIs-n9&2bGYiJ&8XdY{59&2bGYiJ&8XdY{59&2bGYiJ&8XdY{59&2bGE1Jj3FOP-08k)Nrn!6gBy"
  "BeCi8k)O`=B}c-tD(88XznVSyNc$nqPeS~xvQbMtD(88XznVSyBeCiisr6{=B|e3uA;fCXznVSyNc$nqPeS~xvQbMt7z^jn!8#wcQrJ370q1@&0P)6"
  "T}5+OLvvTr+||(B)zI8kG<OxvT}5+O(cD!ucNNWDEt<QE=B}c-t7z^jn!AeTuA;fCp}DJQ?kd0B6`m=Yql)IJhUTcEIjU%mDw?B;=BT1Ms%VZXnxo1"
  "uM}?OfnwJ`ymm0sk6fP>7i;Cu=hUTK8xu~JJsPW51;h&=Ur)d6ZX#Qzv{%L6bX=wgwX#Qzv{wbP&isql9`KM_9X=wgwX#Qzv{%L6bDVl#8ntvL<{1e"
  "V;{Bllsrt!-&;gg2ulcM>gXg(>LPm1P~qWPp~K51w^X=pwvnoo-6lcM>gXg(>LPm1P~qWPqu`J|!wq@nqwq4}ht`J`w*DVk4;=98lNq-Z`Vnoo-6lc"
  "M>gXg(>LPa2v}8k$dv=97lzlZNJ#hUSwN%_j}bCk@RfEt*eSG@mpypENX|G&G+S%_rrTPoCM(O{MLwEk_?tlhMvKto$}>n)QCgGCi#M-ngKz_5R#N6"
  "Rr1qb+xh9r3)Ln$*<2gFX(G!Kdi~U|Le2koomRi@65gb>$52oOF{IBs!#!%&tW`)3-D$Bmzr@rcjWFgj7%EML0pg*P*vJUQ$Rty98{HlW1<FJgMP;>"
  "^&2SnN{EJV77yi_G>e{5HYkgqgJxlU1GdNdT3FK%)PTEyYSAC;iB$`+!k0>cJh>rg77gWW{)1=HLV8ZeLD~EQw2++Go$GKX>OkYj4dl*aK^<rpt)UR"
  "!MceUn7KiW}S_#@t^LQc8=NLTcItl|V<P=aWmE}R)m7CBXG=m0%2C*OL53=WmT$pQ7ZR$deKn=Mos5TX%o*a#9G)<&lpq@Ml6ixlPG>_w{6hMur45&"
  "0W1_e-l-o+caG99BUv<0+_&w`HOJJ;Y_yW$(uXf0?B9|F~;qTGU`xh|zrPl^Y%U=x%|?Xf0?2h(A!SqmzR^|cWV;!GaQGsusg&@oUZKLz>GUf#_+`8"
  "r*utF#%kn@@u-Q)_O+#mR$;Qy(gZYa1>GDo#z=kDIVNxlt5V1NpHF$c^%F0Ow^#sz?bG2nyg0po&zH*JBS`VGlE~p9>MCfY#AQ-omT-7#*au)C07IC"
  "x8x;Hz)8UUPenu;eVTi=sIW#E#YMD%t<to&d?Z8GA{y+q`F+6D{x0@L7nLvRX|h<)PnL-3C@RWKB`aUKqa^-C?EZx>HHs+r7{#jGeFZh5>$qS+i_DK"
  "NbWR<{6OtE3gnLWzLjI~-jC2Z+78;v7eGfSiCgnYIz=a~dvp@}mAhLf@ht7|G!yV7gJ>0~9UlN41h?ar;QfdM)DC}Z5Tat(*`l}>#qK(T+HhY`QQFG"
  "3yp7M%d8$syAX`2II!``0s}USRyKz=$<r1$1?Z*Dtb9?O1VB|<)kUiH14W<oziPv!^9i@+S5p;?F0Uae~8}?@hil+*+2xP<SLGhHA1NjP9q|da0E`t"
  "L36X-L2p_81*c_^Fyrf|?n-U-SkcdpBBJdVavN9?{Eq86aB<j4i_w_8#s6{Ibo+-pHZeK;QvWN(^Il}Lf|@ng_*tlz+gu>Ky_tOIS}qo8}#na{E-kE"
  "9XwmVO7F<x!v!$o)~=1-U<(=F?QrC=LUSrsf>X2e}8`rp=TJ3g$bY+sNzrOvvl<$mPDE`8)+wp2l$*-oycPf*Ml_s0?2MouJ7$dviFLR^#j~15M(sp"
  "w%>rOYs4oPq(Ncd4fu@FX$E>;dCy~_o*2@AO}!7HwQJt*(<>larPGD^reAH@LkYi+Qs>KIbWe|R2lDdIie8IHq;6y?u}Y8nL1G&kP~+RO~$z@hBGq("
  "XT}NVvmK%+&>+;JV>|@4XeK?SEYLB22AWA%cr5qh&*Ve?lmQyc4?#Xuo*lS5H>2^?oN9m^*Z_^EuXLKvb4hwnujw4<G`|DAr;<E^>v02erMa{KG=k$"
  "muGEREqvj7s&9|WbcSO`3Gz`yPl561E4QfF3Kqc7~WRQtoFn}M?H1vXLpn@EpOEerjkmuk8OvBk2h{zi>otR2cab~KApCh?Am!Nr|dN_yWaQ5=x>@}"
  "r{pmMwz^f&Tl8*fLxTtJTO2W{h<pbIpY=ka%1OQk7>2sDq&gGwV`mLf-zkR!?HHTH;VfND_=?Lc1VAd@d5$4??U1v*JxamH-<59HuzoHtuUVW8@$nY"
  "-~WPUBr%rAnaP+#2LWRrxE<Yg-ycCFwl>jtF~+$c8KOBCbH|sTC~*RpfP`_0*3uu(v+g+lN#Ll)=?NbCIY1oCkU8h};YS`Evruk#_QC^oYyo5vS2Fb"
  "|E?ox<W_su1oS?*mEBm0qVzdK@G5GGxxxn30PGOw3(ei6Q~K^TvK*KrL*9jHbpcX<W62}@^D^CbLbHb0GT`uGzXpA4n6L7^thT-1Z2l`KwYpWW3Ve>"
  "*pWr3SGI`GfT|;ZYa(YyB4>qiKsEU#=q=UcZs>i2-Zut)ur#8^phoERMYs`qeOIc39@hv_T~Jrl-u=86wf8#Rq}`zXd=+#Z{jn%|VpsIUx)cp6%Bi3"
  "<<m^sl)mCKGW#rm&L{~uDXgT}vY~DtzD1;(FKD-;WifSVloVY!5Z9Hn46QXgTPN-a4Xc+3}Y}Bv(pxo;gL}k$nhNCacK`)pIiscocIb^VKCmuk<X&`"
  "!KCq(X`;izx5xF_n{L~4h>)e}*B&_r5^6)Si@?ZYYqB>3z=L|xINyWqTyMvoo>8VpDBL)0BP<<8^bFa~;`JED#t7!99bFCIcm>3_&IFGP<(OVLT3xd"
  "^UBs4ukzIdeZy5!AXect@A;jv7-p5F*eb{H84z#<ei@BNtFx_5>A1?RMlsxE7+8aG64gCV~o47u1|mJQ_7{CLF93qFJDZ^qu}g?v+O7l|i4Ki%uH}T"
  "1!!QMhowy{&+?Mv;xn&5798rPl-Gm9VI^<2jyP#BkG7Xop=~_us_y!LNow0oI=@~C-V*pre!n<<jttlh${0w4&^qqgKoejLJ=(k?Vy94%KiB^O{F_j"
  "8kEY7KvQvsTjI>r!I|krEkG@~C#Wt=p&V!7nuY4}1=n(@IZg4i7*~SxIKg>Z!+-n`xqzbJk~^$6xeL`I2iF~(1KLG)+zMy7CeCngY6)t^y+Cy+osXj"
  "SK0xjL3pLgOQ3FtO_=yKk=dy4TFIo)p;6zXa)k06H&F!c?dP;Xtd7Ob}hz7EPi%y4&KBi2N;wPXPbb?1CXa9$sT|fmvqq!>R5#C*G?uB<Z37>TW)rK"
  "3lM-+|DV~eXTxHqU5PX^gyuTqh-jgYf<kiRt%y#xtzEgrQZ6}7@d{jZLwJIDezo60G0vr80)UYUYuKIjr^$TaSQ8sbgisBa+Dw{S#(ycjdY222%+^e"
  ">EKF&6-RLSGojWziR!pcf1R4TQT+M^uXs<JsHc+5be(Esy9vs2O_0Q1pr1E-{pRc_a^|P|!TAcf^`@SksaYfgJfB=ue!m<9M&xln3W53zU03j%X}qn"
  "xE*D<uK*^OFyXq{+}v{N}va&aecar9&`#+oL_+u@d7xfE1WY9^G<z4%R!w{H-^ErGT~aYDGoG@(?K8cgau$#pI}r~@VBlY@&|pUApVBWZ=~f^it6(e"
  "M4ds)kvsm#o=9X)JUneKqV=G)G>4a=daXv~+KQSs8__n<D&$cj$03i>@oeFsM0i>@qHS=({d^uZb1=n#+Vf%1P4txMaJ&RKUIfltAfiOj23iW&+Jug"
  "{39e;>t1H`pHeru_`5e!qci7+aAYXnDdY3!ZVLf3*4SaSJqGS+$k{x=+Z<yWekPGM@=oWT}{CNgugm}ydk#O(;L=m6_{LUWha#z_?D|8ooWQ#qb8gP"
  "%gaFvd5kNTi`+!@pn&QJ&r=?#ah2G7Zd=pm>QYR@8c{<Y}!>(OWDAzBBDLEY{Ohi?Lh|ATBnUAa2w9D3FgIKvq@LlS1FZHNYg&ZAC_f)!qZ5zeOrpi"
  "z7abOQd+8P1S|9U6(fS&C=`C>dwtAWp|CoQ&I;_0kYc1>MEGJc0XiEKR`#eE~FqKY*rS{W(5^^>46;r$OiVHRugypPg{d>u}D?=w*`-Z3Qi%^?U)7c"
  "Lt@<2buu7z(JrC%#S<J%POOnT|_PNL9{)W@cqT{ov-kn_3-Y_A({tzhq}IkUC;|WQGKI8D^Qd7A#%oS(iSsFKg=d8Kr4A4s2}E%RqV`t&^r#GXE`I<"
  "59*7#XEi2856mpNGfo>s2S9x=->v2(%y*{{wFa%mnuCbEIFdWSD~8Y>8V`!(K+q6cgBi97r(u#zrRtz)wt(DlzX`9!{X^htpeCrdZir&Qm2iezgR6n"
  "o;{G8-`!VzGhWlN`%v%W*10Oq#XfGzo?by!?m?mRE348=}0kv@oYEf0xqUG@0X^7%L;n=q`cz3Vx?%rUgIEbhR=r-!oOmx>d=&UO!5;T+dfR<v?gt2"
  "m7xIM#LOIXd75$%B4C-Fr*d1dTL5~5?EQ}CiOsHP)PNf)92)<iT0B<NZD@V_m?|8|4+fcEh<kV5TE<tnJX&Zxe@pj6%ra)x7`N2ZQKZoWs|b43&i8i"
  "6zEYt2|2YaO(~?{X`m4V~p2Zp?3~8@;3|pd5Avb;B&?!I_xFo}k<OKqv7)5As5k4<`B(`BV-zIu?|Hdi4-dCjX#g=rvC<OaBM@f$m-w(J^%TEPhJQ5"
  "Pt{#2iGoxC=2eLjoIWmV&ZH><w4KEeG!!hO`+qUzWf6895diWUXK|tgZ@FjtVi?#lz|$)4$gcJ&U_TP0DDF*97S{pd>Hrt1lxcr!m(Q+I*iHo2>(g<"
  "G2JrA1}<FzQ93ve`mZCHK}T@^KB7FF7qgoqX19uP>2ySYfgWHkzJeZI5k2}dT>U5_AJAWzo0?-*Dv4RC2b}>m=Qp6&@c+h`J=<dT?1p^~M&u0IjQww"
  "nY2Ym;fo@pyJEFFrQE<pT$b}Wig=@4Aw1;ni_Tc-g;yX*?JKN&DH|MH&?`;vq;%v;s8D4?2u?LiZbD|LSMMXG{+4cph!bQ*p%=;e@9mfv-fxTUbUAz"
  "Rk$R9xq(VINcozl^neCZF6CocqjM6L7WaMZe;h~hw=SmTRmB5K+=%v=GeY5hTIsBd=>okVR6=fAPy1U?&%=oV-v?oR~&4PJ~{dlRAn&<W&zBv(f6x4"
  "|>+14ZI__aGX93cdg{OB|~BG*BVTiPaGOL^t-}ayXL((5F23Usyr`MEP(g6<31ul*8{8A}`Qm7^@3<M`831PxKLcM7=?|KcnDap6Duj;bW~3^#b)q4"
  "Ya`h_QL)8!vk9)>Iv#a7R<ISxIgv8Y#R^i$R?;KUF92mldthrT(9GL4c8m^d5iDzJ-&^f_xKL3w{g9TpZ^CI!EXu"
)


@functools.cache
def _canonical_mesh_cm() -> tuple[np.ndarray, np.ndarray]:
  raw = zlib.decompress(base64.b85decode("".join(_CANONICAL_MESH_B85)))
  split = NUM_LANDMARKS * 3 * 4
  vertices = np.frombuffer(raw[:split], "<f4").reshape(NUM_LANDMARKS, 3)
  triangles = np.frombuffer(raw[split:], "<u2").reshape(NUM_TRIANGLES, 3)
  return vertices, triangles


def canonical_face_mesh() -> tuple[np.ndarray, np.ndarray]:
  """MediaPipe's canonical face with irises: vertices (478, 3) float32 in decimetres, triangles (906, 3) int32."""
  vertices, triangles = _canonical_mesh_cm()
  return vertices / np.float32(CM_PER_UNIT), triangles.astype(np.int32)


def landmark_face_model(mean_shape=None, expression_basis=None, *, color: float = GREY_ALBEDO) -> MorphableModel:
  """The landmark morphable model: mean shape (478, 3) in decimetres (default: the canonical mesh), basis (1434, K<=64).

  Not re-centred: the mean shape stays in the canonical frame the coefficients' poses were fitted in.
  """
  canonical, triangles = canonical_face_mesh()
  mean_shape = canonical if mean_shape is None else np.asarray(mean_shape, np.float32)
  if mean_shape.shape != (NUM_LANDMARKS, 3):
    raise ValueError(f"landmark mean_shape has shape {mean_shape.shape}; expected ({NUM_LANDMARKS}, 3)")
  basis = np.zeros((3 * NUM_LANDMARKS, EXPRESSION_DIM), np.float32)
  if expression_basis is not None:
    expression_basis = np.asarray(expression_basis, np.float32)
    if expression_basis.ndim != 2 or expression_basis.shape[0] != 3 * NUM_LANDMARKS:
      raise ValueError(
        f"expression_basis has shape {expression_basis.shape}; expected ({3 * NUM_LANDMARKS}, K <= {EXPRESSION_DIM})"
      )
    if expression_basis.shape[1] > EXPRESSION_DIM:
      raise ValueError(f"expression_basis has {expression_basis.shape[1]} components; at most {EXPRESSION_DIM} fit")
    basis[:, : expression_basis.shape[1]] = expression_basis  # fewer components: zero columns
  return from_mesh(mean_shape, triangles, expression_basis=basis, color=(color,) * 3, keypoints=LANDMARK_KEYPOINTS,
                   recenter=False)  # fmt: skip


# --------------------------------------------------------------------------- files

_ARRAYS = ("mean_shape", "identity_basis", "expression_basis", "mean_texture", "texture_basis", "triangles")
_OPTIONAL = ("point_buf", "keypoints")


def save_face_model(model: MorphableModel, path: str | os.PathLike) -> None:
  """Any MorphableModel -> a compressed `.npz` (zero bases cost nothing); written atomically."""
  model.validate()
  arrays = {name: np.asarray(getattr(model, name)) for name in _ARRAYS}
  arrays.update({name: np.asarray(getattr(model, name)) for name in _OPTIONAL if getattr(model, name) is not None})
  path = os.fspath(path)
  tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
  np.savez_compressed(tmp, format=np.array(FORMAT), version=np.array(1), **arrays)
  os.replace(tmp, path)


def load_face_model(path: str | os.PathLike) -> MorphableModel:
  """A `save_face_model` `.npz`, or Deep3DFaceRecon's `BFM_model_front.mat` (via `load_bfm`) -> MorphableModel."""
  path = os.fspath(path)
  if path.lower().endswith(".mat"):
    return load_bfm(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001  (missing file, not a zip, truncated: all mean unreadable)
    raise CheckpointReadError(f"cannot read the face model {path!r}: {type(e).__name__}: {e}") from e
  if str(data.get("format", "")) != FORMAT:
    raise CheckpointReadError(f"{path!r} is not a mimajax face model (no format={FORMAT!r}; keys {sorted(data)})")
  missing = [k for k in _ARRAYS if k not in data]
  if missing:
    raise CheckpointReadError(f"{path!r} is missing {missing} (found {sorted(data)})")
  floats = {k: jnp.asarray(data[k], jnp.float32) for k in _ARRAYS if k != "triangles"}
  ints = {k: jnp.asarray(data[k], jnp.int32) for k in ("triangles", *_OPTIONAL) if k in data}
  try:
    return MorphableModel(**floats, **ints).validate()
  except ValueError as e:
    raise CheckpointReadError(f"{path!r}: {e}") from e


__all__ = [
  "LANDMARK_KEYPOINTS",
  "NUM_LANDMARKS",
  "canonical_face_mesh",
  "landmark_face_model",
  "load_face_model",
  "save_face_model",
]
